"""Distillation: losses between a student's and a teacher's outputs, and the distillation loop."""
