// System-library shim: exposes <liburing.h> (liburing-dev, pkg-config 'liburing') to Swift and nothing else.
#include <liburing.h>
