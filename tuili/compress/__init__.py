"""Model compression: structured pruning (`tuili prune`) and knowledge distillation (`tuili distill`)."""
