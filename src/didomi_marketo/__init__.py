"""didomi-marketo: batch-sync Didomi consent into Marketo lead fields."""

__version__ = "0.1.0"
