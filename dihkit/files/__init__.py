"""Files on disk: checkpoint reading and atomic writing, locks on output paths."""
