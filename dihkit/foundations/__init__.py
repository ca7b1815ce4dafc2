"""What every layer leans on and that leans on nothing: the user-error type, flag declarations and their
ranges, the frozen settings, the training-type record."""
