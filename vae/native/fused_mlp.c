/* The MLP VAE's training step in C, for float32 on the CPU: vae/fused.py's FusedStep (forward and backward) and
 * Adam's step in one call (vae_fb), or a chunk of such steps (vae_fb_steps, for Trainer.steps).
 *
 * Same computation and the same gradients as FusedStep's torch code (and so as autograd on vae.losses.elbo_terms),
 * and torch.optim.Adam's update; tests/test_native.py checks them. What C adds: the elementwise work is done in a
 * few passes that each finish a layer (bias, ReLU, its mask in the backward pass and the bias gradient's column sums
 * at once) instead of a dozen separate torch operations; Adam runs layer by layer while the gradients are in cache;
 * one call from Python replaces about sixty, and a chunk's steps have no Python between them. The GEMMs are
 * torch's own: the BLAS sgemm_ that libtorch exports, found at run time and handed to vae_set_sgemm, so they run
 * exactly as torch.mm runs them.
 *
 * Layout: every matrix is row-major float32, contiguous. Layer l maps in[l] -> out[l] with W[l] (out x in) and
 * b[l] (out). Layers 0 .. n_enc-1 are the encoder's hidden layers (ReLU), layer n_enc gives (mu, raw logvar)
 * (2d outputs), then n_enc decoder hidden layers (ReLU), then the last layer gives the decoder parameters
 * (Bernoulli logits or the Gaussian mean), D outputs.
 *
 * Built by vae/native.py with the C compiler of the machine; without one, vae.fused's torch path runs instead. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vae.native assumes a little-endian machine (see gemm)"
#endif

#define VAE_MAX_LAYERS 34
#define VAE_MAX_THREADS 8
#define EXP_FLOOR 40.0f /* as vae/fused.py: log(1 + exp(-t)) is 0 in float32 for t >= 40 */

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
static sgemm_fn sgemm_ptr = 0;

int vae_set_sgemm(void *f) { sgemm_ptr = (sgemm_fn)f; return 0; }
int vae_abi_version(void) { return 5; }

typedef struct {
    int n_layers, n_enc, d, D, likelihood; /* likelihood: 0 Bernoulli, 1 Gaussian with a fixed sigma */
    int threads;                            /* for the elementwise passes (the GEMMs follow torch's setting) */
    float inv_var;                          /* Gaussian: 1 / sigma^2 */
    double recon_const;                     /* Gaussian: D (log sigma + log(2 pi) / 2), per example */
    float logvar_min, logvar_max;
    int in[VAE_MAX_LAYERS], out[VAE_MAX_LAYERS];
    const float *W[VAE_MAX_LAYERS], *b[VAE_MAX_LAYERS];
    float *gW[VAE_MAX_LAYERS], *gb[VAE_MAX_LAYERS];
} vae_net;

/* Adam's state for each layer's weight (2 l) and bias (2 l + 1): torch.optim.Adam's exp_avg, exp_avg_sq and step
 * tensors (float32, updated in place, so the optimizer's state_dict stays the truth). */
typedef struct {
    float *exp_avg[2 * VAE_MAX_LAYERS], *exp_avg_sq[2 * VAE_MAX_LAYERS], *step[2 * VAE_MAX_LAYERS];
    double lr, beta1, beta2, eps;
} vae_adam;

/* Row-major C (M x N) = alpha op(A) op(B) + beta C, where op(A) is M x K; ta: A is stored K x M (transposed). */
static void gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                 float beta, float *C, int ldc) {
    /* column-major view: C^T (N x M) = op(B)^T op(A)^T. The sizes sit in 64-bit slots: a BLAS with 32-bit
     * integers reads their low halves (little-endian), one with 64-bit integers (ILP64) the whole, and both read
     * the right value. */
    const char a = tb ? 'T' : 'N', c = ta ? 'T' : 'N';
    const int64_t m = M, n = N, k = K, la = lda, lb = ldb, lc = ldc;
    sgemm_ptr(&a, &c, (const int *)&n, (const int *)&m, (const int *)&k, &alpha, B, (const int *)&lb, A,
              (const int *)&la, &beta, C, (const int *)&lc);
}

/* |C - want| summed for a 2x3 by 3x2 product through gemm: 0 when the sgemm found is the BLAS it is taken for. */
double vae_gemm_selftest(void) {
    if (!sgemm_ptr) return -1.0;
    const float A[6] = {1, 2, 3, 4, 5, 6}, Bm[6] = {7, 8, 9, 10, 11, 12}, want[4] = {58, 64, 139, 154};
    float C[4] = {0, 0, 0, 0};
    gemm(0, 0, 2, 2, 3, 1.0f, A, 3, Bm, 2, 0.0f, C, 2);
    double err = 0.0;
    for (int i = 0; i < 4; i++) err += fabs((double)C[i] - want[i]);
    return err;
}

/* Whether this build's elementwise passes can use threads. */
int vae_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* exp and log that vectorise (Cephes' expf and logf: about 1e-7 relative error), so that the passes below run as
 * SIMD loops with no libm calls. */
static inline float bits_to_float(int32_t i) { float f; memcpy(&f, &i, 4); return f; }
static inline int32_t float_to_bits(float f) { int32_t i; memcpy(&i, &f, 4); return i; }

static inline float vexp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* n = round(x / ln 2), by adding and taking away 1.5 * 2^23 (floorf does not vectorise well everywhere) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * bits_to_float(((int32_t)n + 127) << 23);
}

static inline float vlog(float x) { /* x > 0, normal */
    int32_t i = float_to_bits(x);
    float e = (float)(((i >> 23) & 0xff) - 126);
    float m = bits_to_float((i & 0x007fffff) | 0x3f000000); /* in [0.5, 1) */
    int small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    return m + y + 0.693359375f * e;
}

/* Rows [r0, r1) of the pass after a hidden layer's GEMM: a = relu(a + bias). */
static void bias_relu_rows(float *a, const float *bias, int r0, int r1, int n) {
    for (int r = r0; r < r1; r++) {
        float *row = a + (long)r * n;
#pragma omp simd
        for (int j = 0; j < n; j++) {
            float v = row[j] + bias[j];
            row[j] = v > 0.0f ? v : 0.0f;
        }
    }
}

/* Rows [r0, r1) of the backward pass into a hidden layer: g *= (a > 0), and colsum += g (the bias gradient). */
static void relu_back_rows(float *g, const float *a, float *colsum, int r0, int r1, int n) {
    for (int j = 0; j < n; j++) colsum[j] = 0.0f;
    for (int r = r0; r < r1; r++) {
        float *gr = g + (long)r * n;
        const float *ar = a + (long)r * n;
#pragma omp simd
        for (int j = 0; j < n; j++) {
            float v = ar[j] > 0.0f ? gr[j] : 0.0f;
            gr[j] = v;
            colsum[j] += v;
        }
    }
}

/* Rows [r0, r1) of the likelihood pass. o: the last GEMM's output (bias not yet added), x the data. Writes
 * g = dloss/d(decoder parameters) (the batch mean's 1/B included) and colsum(g); returns the sum of -log p(x|z)
 * over these rows (Bernoulli), or of the squared residuals (Gaussian). */
static double likelihood_rows(const vae_net *net, const float *o, const float *bias, const float *x, float *g,
                              float *colsum, int r0, int r1, float inv_b) {
    const int D = net->D;
    double total = 0.0;
    for (int j = 0; j < D; j++) colsum[j] = 0.0f;
    for (int r = r0; r < r1; r++) {
        const float *orow = o + (long)r * D, *xr = x + (long)r * D;
        float *gr = g + (long)r * D;
        float acc = 0.0f;
        if (net->likelihood == 0) {
            /* BCE(l, x) = [max(l, 0) - x l] + log(1 + exp(-|l|)); the log of each run of 64 pixels' factors
             * 1 + exp(-|l|) (each in [1, 2], so their product stays below 2^64) is taken once, of their product */
            float logs = 0.0f;
            for (int j0 = 0; j0 < D; j0 += 64) {
                const int jn = j0 + 64 < D ? j0 + 64 : D;
                float prod = 1.0f;
#pragma omp simd reduction(+ : acc) reduction(* : prod)
                for (int j = j0; j < jn; j++) {
                    float l = orow[j] + bias[j], xv = xr[j];
                    float t = fabsf(l);
                    t = t < EXP_FLOOR ? t : EXP_FLOOR;
                    float e = vexp(-t), ope = 1.0f + e;
                    float s = (l >= 0.0f ? 1.0f : e) / ope; /* sigmoid(l) */
                    prod *= ope;
                    acc += (l > 0.0f ? l : 0.0f) - xv * l;
                    float gv = (s - xv) * inv_b;
                    gr[j] = gv;
                    colsum[j] += gv;
                }
                logs += vlog(prod);
            }
            total += (double)acc + (double)logs;
        } else {
            const float k = net->inv_var * inv_b;
#pragma omp simd reduction(+ : acc)
            for (int j = 0; j < D; j++) {
                float res = orow[j] + bias[j] - xr[j];
                acc += res * res;
                float gv = res * k;
                gr[j] = gv;
                colsum[j] += gv;
            }
            total += (double)acc; /* the sum of squares: vae_fb scales it */
        }
    }
    return total;
}

/* Thread t of nt takes rows [B t / nt, B (t + 1) / nt): a fixed split, so a given thread count always adds in the
 * same order (seeded runs repeat exactly). */
#define ROWS(t, nt, B) int r0 = (int)((long)(B) * (t) / (nt)), r1 = (int)((long)(B) * ((t) + 1) / (nt))

static int pass_threads(const vae_net *net, long work) {
    int nt = net->threads < 1 ? 1 : (net->threads > VAE_MAX_THREADS ? VAE_MAX_THREADS : net->threads);
    return work < 16384 ? 1 : nt; /* below that, waking a second thread costs more than it saves */
}

static void sum_parts(float *dst, const float *part, int nt, int n) {
    for (int j = 0; j < n; j++) {
        float s = 0.0f;
        for (int t = 0; t < nt; t++) s += part[(long)t * n + j];
        dst[j] = s;
    }
}

static void bias_relu(const vae_net *net, float *a, const float *bias, int B, int n) {
    int nt = pass_threads(net, (long)B * n);
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
    for (int t = 0; t < nt; t++) {
        ROWS(t, nt, B);
        bias_relu_rows(a, bias, r0, r1, n);
    }
}

static void relu_back(const vae_net *net, float *g, const float *a, float *gbias, float *part, int B, int n) {
    int nt = pass_threads(net, (long)B * n);
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
    for (int t = 0; t < nt; t++) {
        ROWS(t, nt, B);
        relu_back_rows(g, a, part + (long)t * n, r0, r1, n);
    }
    sum_parts(gbias, part, nt, n);
}

/* torch.optim.Adam's step (no weight decay, amsgrad or maximize) for one tensor of n values: step += 1, then
 *   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2,
 *   p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps). */
static void adam_update(const vae_net *net, const vae_adam *adam, int k, float *p, const float *g, long n) {
    float *m = adam->exp_avg[k], *v = adam->exp_avg_sq[k];
    const float st = *adam->step[k] + 1.0f;
    *adam->step[k] = st;
    const double bc1 = 1.0 - pow(adam->beta1, st), bc2 = 1.0 - pow(adam->beta2, st);
    const float b1 = (float)adam->beta1, b2 = (float)adam->beta2, c1 = (float)(1.0 - adam->beta1),
                c2 = (float)(1.0 - adam->beta2), step_size = (float)(adam->lr / bc1), bc2_sqrt = (float)sqrt(bc2),
                eps = (float)adam->eps;
    int nt = pass_threads(net, n);
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
    for (int t = 0; t < nt; t++) {
        const long i0 = n * t / nt, i1 = n * (t + 1) / nt;
#pragma omp simd
        for (long i = i0; i < i1; i++) {
            float gi = g[i];
            float mi = b1 * m[i] + c1 * gi;
            float vi = b2 * v[i] + c2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        }
    }
}

/* Adam for layer l's weight and bias, once both gradients are final (and the weight has been used for the
 * gradient below it). */
static void adam_layer(const vae_net *net, const vae_adam *adam, int l) {
    if (!adam) return;
    adam_update(net, adam, 2 * l, (float *)net->W[l], net->gW[l], (long)net->out[l] * net->in[l]);
    adam_update(net, adam, 2 * l + 1, (float *)net->b[l], net->gb[l], net->out[l]);
}

/* Workspace floats vae_fb needs for a batch of B (the caller allocates it, 64-byte aligned is best). */
long vae_workspace_floats(const vae_net *net, int B) {
    long n = 0, widest = net->D;
    for (int l = 0; l < net->n_layers; l++) {
        n += 2L * B * net->out[l]; /* each layer's output and the gradient there */
        if (net->in[l] > widest) widest = net->in[l];
        if (net->out[l] > widest) widest = net->out[l];
    }
    n += 3L * B * net->d;                  /* logvar (clamped), std, z */
    n += net->d;                            /* each dimension's KL weight in the loss */
    n += (long)B * net->D;                  /* the batch, gathered */
    n += (long)VAE_MAX_THREADS * widest;    /* per-thread column sums */
    return n;
}

/* One batch x (B x D): the loss terms into terms[0..2] = (loss, recon, kl), nats per example (batch means), and
 * every weight's and bias's gradient of the loss. eps (B x d) is the reparameterisation's standard-normal draw.
 * beta, free_bits (0: none) and capacity (has_capacity: loss = recon + beta |R - C|) as vae.losses.elbo_terms.
 * rows (or NULL): x holds n_src examples and the batch is x[rows[0]], ..., x[rows[B - 1]] (gathered here: returns
 * -2 for a row out of range). adam (or NULL): also take Adam's step, layer by layer as soon as a layer's gradients
 * are done, while they are still in cache. Returns 0, or -1 when the net is not one this code covers or no sgemm
 * is set. */
int vae_fb(const vae_net *net, const float *x, const int64_t *rows, long n_src, const float *eps, int B, float *ws,
           double beta, double free_bits, int has_capacity, double capacity, double *terms, const vae_adam *adam) {
    const int L = net->n_layers, ne = net->n_enc, d = net->d, D = net->D;
    if (!sgemm_ptr || L != 2 * ne + 2 || L > VAE_MAX_LAYERS || ne < 1 || net->out[ne] != 2 * d ||
        net->in[ne + 1] != d || net->out[L - 1] != D || net->in[0] != D || B < 1)
        return -1;
    float *act[VAE_MAX_LAYERS], *grad[VAE_MAX_LAYERS];
    float *p = ws;
    for (int l = 0; l < L; l++) {
        act[l] = p; p += (long)B * net->out[l];
        grad[l] = p; p += (long)B * net->out[l];
    }
    float *logvar = p; p += (long)B * d;
    float *sd = p; p += (long)B * d;
    float *z = p; p += (long)B * d;
    float *kl_w = p; p += d;
    float *xbuf = p; p += (long)B * D;
    float *part = p;
    const float inv_b = 1.0f / (float)B;
    if (rows) {
        for (int r = 0; r < B; r++) {
            if (rows[r] < 0 || rows[r] >= n_src) return -2;
            memcpy(xbuf + (long)r * D, x + rows[r] * (long)D, sizeof(float) * D);
        }
        x = xbuf;
    }

    /* ---- forward ---------------------------------------------------------------------------------------- */
    const float *in = x;
    for (int l = 0; l < ne; l++) {
        gemm(0, 1, B, net->out[l], net->in[l], 1.0f, in, net->in[l], net->W[l], net->in[l], 0.0f, act[l], net->out[l]);
        bias_relu(net, act[l], net->b[l], B, net->out[l]);
        in = act[l];
    }
    float *h = act[ne]; /* (B, 2d): mu | raw logvar */
    gemm(0, 1, B, 2 * d, net->in[ne], 1.0f, in, net->in[ne], net->W[ne], net->in[ne], 0.0f, h, 2 * d);
    double kl2[1024]; /* 2 KL per dimension, summed over the batch; d <= 1024 (checked below) */
    if (d > 1024) return -1;
    for (int k = 0; k < d; k++) kl2[k] = 0.0;
    for (int r = 0; r < B; r++) {
        float *mu = h + (long)r * 2 * d, *rl = mu + d;
        const float *bm = net->b[ne], *bl = bm + d;
        for (int k = 0; k < d; k++) {
            mu[k] += bm[k];
            rl[k] += bl[k];
            float lv = rl[k] < net->logvar_min ? net->logvar_min : (rl[k] > net->logvar_max ? net->logvar_max : rl[k]);
            float s = vexp(0.5f * lv);
            long i = (long)r * d + k;
            logvar[i] = lv;
            sd[i] = s;
            z[i] = mu[k] + s * eps[i];
            kl2[k] += (double)(s * s - 1.0f + mu[k] * mu[k] - lv);
        }
    }
    in = z;
    for (int l = ne + 1; l < L - 1; l++) {
        gemm(0, 1, B, net->out[l], net->in[l], 1.0f, in, net->in[l], net->W[l], net->in[l], 0.0f, act[l], net->out[l]);
        bias_relu(net, act[l], net->b[l], B, net->out[l]);
        in = act[l];
    }
    const int lo = L - 1;
    gemm(0, 1, B, D, net->in[lo], 1.0f, in, net->in[lo], net->W[lo], net->in[lo], 0.0f, act[lo], D);

    /* ---- the terms, and the gradient at the decoder's output ------------------------------------------ */
    double recon_sum = 0.0;
    {
        int nt = pass_threads(net, (long)B * D);
        double tot = 0.0;
#pragma omp parallel for num_threads(nt) schedule(static, 1) reduction(+ : tot) if (nt > 1)
        for (int t = 0; t < nt; t++) {
            ROWS(t, nt, B);
            tot += likelihood_rows(net, act[lo], net->b[lo], x, grad[lo], part + (long)t * D, r0, r1, inv_b);
        }
        recon_sum = tot;
        sum_parts(net->gb[lo], part, nt, D);
    }
    /* The sums are accumulated in double, but they are float32 quantities, as the torch step's are: each is
     * rounded to float32 (F32), so one beyond its range has overflowed (inf) as it does there, and the trainer's
     * guard sees it. */
#define F32(v) ((double)(float)(v))
    recon_sum = F32(recon_sum);
    if (net->likelihood == 1) recon_sum = F32(0.5 * net->inv_var * recon_sum);
    for (int k = 0; k < d; k++) kl2[k] = F32(kl2[k]);
    double recon = F32(recon_sum / B + (net->likelihood == 1 ? net->recon_const : 0.0));
    double kl = 0.0, reg = 0.0;
    for (int k = 0; k < d; k++) kl += 0.5 * kl2[k] / B;
    for (int k = 0; k < d; k++) {
        double v = 0.5 * kl2[k] / B;
        reg += free_bits > 0 ? (v > free_bits || v != v ? v : free_bits) : v; /* a NaN stays NaN */
    }
    kl = F32(kl);
    reg = free_bits > 0 ? F32(reg) : kl;
    double sign = 1.0, loss;
    if (has_capacity) {
        sign = reg > capacity ? 1.0 : (reg < capacity ? -1.0 : 0.0);
        loss = F32(recon + beta * fabs(reg - capacity));
    } else {
        loss = F32(recon + beta * reg);
    }
#undef F32
    for (int k = 0; k < d; k++) { /* dloss/dKL_d / B: beta, 0 where free bits hold KL_d up, times sign(R - C) */
        double w = beta * sign;
        if (free_bits > 0 && !(0.5 * kl2[k] / B >= free_bits)) w = 0.0;
        kl_w[k] = (float)(w / B);
    }
    terms[0] = loss;
    terms[1] = recon;
    terms[2] = kl;

    /* ---- backward through the decoder --------------------------------------------------------------------- */
    for (int l = lo; l > ne; l--) {
        const float *a = l == ne + 1 ? z : act[l - 1];
        /* W.grad = g^T a; the bias gradient came with g */
        gemm(1, 0, net->out[l], net->in[l], B, 1.0f, grad[l], net->out[l], a, net->in[l], 0.0f, net->gW[l], net->in[l]);
        float *ga = l == ne + 1 ? grad[ne] /* gz, (B, d): the first half of grad[ne] used as scratch */ : grad[l - 1];
        gemm(0, 0, B, net->in[l], net->out[l], 1.0f, grad[l], net->out[l], net->W[l], net->in[l], 0.0f, ga, net->in[l]);
        if (l > ne + 1) relu_back(net, ga, act[l - 1], net->gb[l - 1], part, B, net->in[l]);
        adam_layer(net, adam, l);
    }
    /* ---- through the reparameterisation and the KL to (dmu, dlogvar), in place over gz -------------------- */
    {
        /* gz sits packed (B x d) at the start of grad[ne] (B x 2d); walk rows from the last so that no row is
         * overwritten before it is read */
        float *gh = grad[ne], *gbh = net->gb[ne];
        for (int k = 0; k < 2 * d; k++) gbh[k] = 0.0f;
        for (int r = B - 1; r >= 0; r--) {
            const float *mu = h + (long)r * 2 * d, *rl = mu + d;
            float gzr[1024];
            memcpy(gzr, gh + (long)r * d, sizeof(float) * d);
            float *gm = gh + (long)r * 2 * d, *gl = gm + d;
            for (int k = 0; k < d; k++) {
                long i = (long)r * d + k;
                float s = sd[i], g = gzr[k];
                float a = g + mu[k] * kl_w[k];
                float c = 0.5f * (g * eps[i]) * s + 0.5f * kl_w[k] * (s * s - 1.0f);
                if (!(rl[k] > net->logvar_min && rl[k] < net->logvar_max)) c = 0.0f;
                gm[k] = a;
                gl[k] = c;
                gbh[k] += a;
                gbh[d + k] += c;
            }
        }
    }
    /* ---- backward through the encoder --------------------------------------------------------------------- */
    for (int l = ne; l >= 0; l--) {
        const float *a = l == 0 ? x : act[l - 1];
        gemm(1, 0, net->out[l], net->in[l], B, 1.0f, grad[l], net->out[l], a, net->in[l], 0.0f, net->gW[l], net->in[l]);
        if (l > 0) {
            gemm(0, 0, B, net->in[l], net->out[l], 1.0f, grad[l], net->out[l], net->W[l], net->in[l], 0.0f,
                 grad[l - 1], net->in[l]);
            relu_back(net, grad[l - 1], act[l - 1], net->gb[l - 1], part, B, net->in[l]);
        }
        adam_layer(net, adam, l);
    }
    return 0;
}

/* n_steps training steps of batch B in one call, each as vae_fb with Adam's step (adam must be given): step i
 * takes the rows rows[i B .. (i + 1) B - 1] of x, the draw eps[i B d ..], betas[i] and capacities[i] (when
 * has_capacity), and writes its (loss, recon, kl) to terms[3 i ..]. Stops after a step with a term that is not finite
 * (its Adam step taken: the caller goes back to saved weights). Returns the number of steps taken, or -1 / -2
 * as vae_fb. */
int vae_fb_steps(const vae_net *net, const float *x, const int64_t *rows, long n_src, const float *eps, int B,
                 int n_steps, float *ws, const double *betas, double free_bits, int has_capacity,
                 const double *capacities, double *terms, const vae_adam *adam) {
    if (!adam || !rows) return -1;
    for (long r = 0; r < (long)n_steps * B; r++) /* every row first: a bad one is refused before any step */
        if (rows[r] < 0 || rows[r] >= n_src) return -2;
    for (int i = 0; i < n_steps; i++) {
        int rc = vae_fb(net, x, rows + (long)i * B, n_src, eps + (long)i * B * net->d, B, ws, betas[i], free_bits,
                        has_capacity, has_capacity ? capacities[i] : 0.0, terms + 3L * i, adam);
        if (rc != 0) return rc;
        if (!isfinite(terms[3L * i]) || !isfinite(terms[3L * i + 1]) || !isfinite(terms[3L * i + 2])) return i + 1;
    }
    return n_steps;
}
