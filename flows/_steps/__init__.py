"""What the steps do, without Prefect: reading records, the models, the content cache, the operations."""
