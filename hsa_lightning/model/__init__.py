"""nn.Modules of the HSA-UltraLong model; nothing here imports Lightning."""
