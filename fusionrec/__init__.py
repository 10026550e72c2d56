"""fusionrec: streaming, real-time, multimodal recommendations."""
