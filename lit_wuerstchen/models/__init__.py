"""Pure nn.Modules: no Lightning, no file I/O."""
