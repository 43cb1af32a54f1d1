"""Raw datasets: dataset.json layouts, case discovery, image I/O with geometry, integrity checks."""
