"""The console's helpers: flag groups, devices, seed runs, concurrent seeds, the `test` mode, the model
summary."""
