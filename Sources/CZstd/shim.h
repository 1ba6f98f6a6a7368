// System-library shim: exposes <zstd.h> (libzstd-dev, pkg-config 'libzstd') to Swift and nothing else.
#include <zstd.h>
#include <zstd_errors.h>
