"""Text-to-image continual customization methods (track ``t2i``)."""
