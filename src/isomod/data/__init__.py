"""Task and suite definitions; generated and real data loaders."""
