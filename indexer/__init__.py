"""OCI images into content-addressed blobs plus an index of the tree (`cafs index`, gc)."""
