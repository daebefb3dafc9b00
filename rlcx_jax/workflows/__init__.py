"""Workflows: what trains, evaluates and exports, one layer above the algorithms (`rl/`) and the pure
parameter transforms (`compress/`): compressing a trained run, prune-and-finetune and lottery-ticket
recipes; next, distillation and the expand-then-compress pipeline."""
