"""The backup repository, which describes itself: manifests, the catalog built from them, records."""
