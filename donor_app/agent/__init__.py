"""The headless agent: sensors → policy → hypervisor, local API, history."""
