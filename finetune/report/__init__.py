"""What a person sees: live progress while training, tables at the end."""
