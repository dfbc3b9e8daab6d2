"""gatrep: image categorization and search with a graph attention autoencoder and representative models."""
