"""Video files as image sources: decoded as a stream, sampled, tracked and written back annotated."""
