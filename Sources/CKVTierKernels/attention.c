/* attention.c - reference causal attention and error sums for measuring codec quality.
 *
 * Not a codec: `kvtier codec advise` compares attention over original and decoded K/V with
 * these. Portable C (the target is always built -O3, so it is fast in debug builds too);
 * the dot products keep eight partial sums, which the compiler turns into vector adds. */
#include "internal.h"
#include <math.h>

#define KVT_LANES 8

static float dot(const float *a, const float *b, size_t n) {
    float acc[KVT_LANES] = {0};
    size_t i = 0;
    for (; i + KVT_LANES <= n; i += KVT_LANES)
        for (size_t l = 0; l < KVT_LANES; l++) acc[l] += a[i + l] * b[i + l];
    float sum = 0;
    for (; i < n; i++) sum += a[i] * b[i];
    for (size_t l = 0; l < KVT_LANES; l++) sum += acc[l];
    return sum;
}

/* Query row qi ([QH, D]) attends keys 0...last; out [QH, D]. */
static void attend(const float *qi, const float *k, const float *v, size_t last, size_t QH, size_t KH, size_t D,
                   float *scores, float *out) {
    const size_t group = QH / KH;
    const float scale = 1.0f / sqrtf((float)D);
    for (size_t h = 0; h < QH; h++) {
        const size_t g = h / group;
        const float *qh = qi + h * D;
        float top = -INFINITY;
        for (size_t j = 0; j <= last; j++) {
            float s = dot(qh, k + (j * KH + g) * D, D) * scale;
            scores[j] = s;
            if (s > top) top = s;
        }
        float total = 0;
        for (size_t j = 0; j <= last; j++) {
            scores[j] = expf(scores[j] - top);
            total += scores[j];
        }
        float *o = out + h * D;
        for (size_t d = 0; d < D; d++) o[d] = 0;
        for (size_t j = 0; j <= last; j++) {
            const float w = scores[j];
            const float *vj = v + (j * KH + g) * D;
            for (size_t d = 0; d < D; d++) o[d] += w * vj[d];
        }
        const float inverse = 1.0f / total;
        for (size_t d = 0; d < D; d++) o[d] *= inverse;
    }
}

int kvt_causal_attention_f32(const float *q, const float *k, const float *v, size_t T, size_t QH, size_t KH,
                             size_t D, const uint32_t *positions, size_t count, float *scores, float *out) {
    if (T == 0 || QH == 0 || KH == 0 || D == 0 || QH % KH != 0) return -1;
    for (size_t p = 0; p < count; p++)
        if (positions[p] >= T) return -1;
    for (size_t p = 0; p < count; p++)
        attend(q + (size_t)positions[p] * QH * D, k, v, positions[p], QH, KH, D, scores, out + p * QH * D);
    return 0;
}

int kvt_attention_at_end_f32(const float *q, size_t count, const float *k, const float *v, size_t T, size_t QH,
                             size_t KH, size_t D, float *scores, float *out) {
    if (T == 0 || QH == 0 || KH == 0 || D == 0 || QH % KH != 0) return -1;
    for (size_t p = 0; p < count; p++) attend(q + p * QH * D, k, v, T - 1, QH, KH, D, scores, out + p * QH * D);
    return 0;
}

void kvt_error_sums_f32(const float *reference, const float *other, size_t count, double sums[3]) {
    double difference = 0, norm = 0, largest = 0;
    for (size_t i = 0; i < count; i++) {
        const double x = reference[i], e = (double)other[i] - x;
        difference += e * e;
        norm += x * x;
        if (fabs(e) > largest) largest = fabs(e);
    }
    sums[0] = difference;
    sums[1] = norm;
    sums[2] = largest;
}
