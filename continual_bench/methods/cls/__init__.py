"""Class-incremental classification methods (track ``cls``)."""
