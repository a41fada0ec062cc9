"""What a flow writes: its tables, annotated images, datasets and gallery."""
