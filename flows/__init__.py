"""Ready-made Prefect flows that chain the prefect-roboflow blocks."""
