"""nn.Modules the models are built from; each parameter knows how to load itself (`weight_loader`)."""
