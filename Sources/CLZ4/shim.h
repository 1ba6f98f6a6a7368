// System-library shim: exposes <lz4.h> (liblz4-dev, pkg-config 'liblz4') to Swift and nothing else.
#include <lz4.h>
