"""The toolkit's machinery beneath the seed's files at the root, one folder per layer.

Layers, lowest first (a folder imports only its own layer and the ones below it; tests/test_structure.py
holds the table): foundations, then sources and files, then runs, then methods (with the root's training
modules), then console and results."""
