"""colshard's shared language: ids, specs, typed requests/results, errors, settings, etcd."""
