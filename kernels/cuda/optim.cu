// The optimizer updates: one grid-stride pass over the flat parameter buffer each, in place, in the
// compute type A; the formulas of torch.optim (the Backend docstrings). Scalars arrive as A, and the
// optimizer state (velocity, m, v) is kept in A, as mixed-precision training does: an fp16 Adam v
// underflows, a bf16 one stops decaying. Each thread takes chunks of vector_width<T> elements of every
// buffer (common.cuh: one vector access per 16 bytes where a chunk is aligned).

// params = params * (1 - lr * wd) - lr * grads
template <typename T>
__global__ void sgd_update(T* params, const T* grads, long long n, acc_t<T> lr, acc_t<T> weight_decay) {
    using A = acc_t<T>;
    constexpr int V = vector_width<T>;
    const A shrink = A(1) - lr * weight_decay;
    for_each_grid_chunk<T>(n, [&](long long i, int k) {
        A p[V], g[V];
        load_chunk(params + i, k, p);
        load_chunk(grads + i, k, g);
        for_each_element<V>(k, [&](int j) { p[j] = p[j] * shrink - lr * g[j]; });
        store_chunk(params + i, k, p);
    });
}

// g = grads + wd * params; v = mu * v + g; params -= lr * (nesterov ? g + mu * v : v)
template <typename T>
__global__ void momentum_update(T* params, const T* grads, acc_t<T>* velocity, long long n, acc_t<T> lr,
                                acc_t<T> momentum, acc_t<T> weight_decay, int nesterov) {
    using A = acc_t<T>;
    constexpr int V = vector_width<T>;
    for_each_grid_chunk<T>(n, [&](long long i, int k) {
        A p[V], g[V], v[V];
        load_chunk(params + i, k, p);
        load_chunk(grads + i, k, g);
        load_chunk(velocity + i, k, v);
        for_each_element<V>(k, [&](int j) {
            g[j] += weight_decay * p[j];
            v[j] = momentum * v[j] + g[j];
            p[j] -= lr * (nesterov ? g[j] + momentum * v[j] : v[j]);
        });
        store_chunk(velocity + i, k, v);
        store_chunk(params + i, k, p);
    });
}

// Adam (decoupled = 0: L2 added to the gradient) or AdamW (decoupled = 1: params scaled first).
// From the host, in double before rounding to A: one_minus_beta1/2 = 1 - beta1/2 (1 - float(0.999)
// would be 1.3e-5 off), bias1 = 1 - beta1^step and bias2 = 1 - beta2^step.
template <typename T>
__global__ void adam_update(T* params, const T* grads, acc_t<T>* m, acc_t<T>* v, long long n, acc_t<T> lr,
                            acc_t<T> beta1, acc_t<T> beta2, acc_t<T> one_minus_beta1,
                            acc_t<T> one_minus_beta2, acc_t<T> eps, acc_t<T> weight_decay,
                            acc_t<T> bias1, acc_t<T> bias2, int decoupled) {
    using A = acc_t<T>;
    constexpr int V = vector_width<T>;
    const A step_size = lr / bias1;
    for_each_grid_chunk<T>(n, [&](long long i, int k) {
        A p[V], g[V], mi[V], vi[V];
        load_chunk(params + i, k, p);
        load_chunk(grads + i, k, g);
        load_chunk(m + i, k, mi);
        load_chunk(v + i, k, vi);
        for_each_element<V>(k, [&](int j) {
            if (decoupled) {
                p[j] *= A(1) - lr * weight_decay;
            } else {
                g[j] += weight_decay * p[j];
            }
            mi[j] = beta1 * mi[j] + one_minus_beta1 * g[j];
            vi[j] = beta2 * vi[j] + one_minus_beta2 * g[j] * g[j];
            p[j] -= step_size * mi[j] / (sqrt(vi[j] / bias2) + eps);
        });
        store_chunk(m + i, k, mi);
        store_chunk(v + i, k, vi);
        store_chunk(params + i, k, p);
    });
}
