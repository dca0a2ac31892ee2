"""The data stage: readers, cleaning operators (`ops`), exact dedup, grouped split and accounting."""
