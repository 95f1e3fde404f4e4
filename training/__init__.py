"""Training and evaluation of overlock models (`overlock train`, `overlock eval`)."""
