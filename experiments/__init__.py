"""Thin absl binaries run as `python -m experiments.<name>`; `cli` holds their shared start-up."""
