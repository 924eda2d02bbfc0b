"""Client data: real federated EMNIST files, the embedded generator, preprocessing, sampling."""
