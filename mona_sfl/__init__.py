"""mona_sfl: split federated self-supervised learning (MonAcoSFL, MocoSFL)."""

__version__ = "0.1.0"
