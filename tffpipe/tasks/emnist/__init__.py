"""Handwritten characters per writer: TFF's federated EMNIST layout, real or embedded."""
