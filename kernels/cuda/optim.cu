// The optimizer updates: one grid-stride pass over the flat parameter buffer each, in place, in the
// compute type A; the formulas of torch.optim (the Backend docstrings). Scalars arrive as A.

// params = params * (1 - lr * wd) - lr * grads
template <typename T>
__global__ void sgd_update(T* params, const T* grads, long long n, acc_t<T> lr, acc_t<T> weight_decay) {
    using A = acc_t<T>;
    const A shrink = A(1) - lr * weight_decay;
    for (long long i = global_thread(); i < n; i += grid_threads()) {
        params[i] = store<T>(load(params, i) * shrink - lr * load(grads, i));
    }
}

// g = grads + wd * params; v = mu * v + g; params -= lr * (nesterov ? g + mu * v : v)
template <typename T>
__global__ void momentum_update(T* params, const T* grads, T* velocity, long long n, acc_t<T> lr,
                                acc_t<T> momentum, acc_t<T> weight_decay, int nesterov) {
    using A = acc_t<T>;
    for (long long i = global_thread(); i < n; i += grid_threads()) {
        const A p = load(params, i);
        const A g = load(grads, i) + weight_decay * p;
        const A v = momentum * load(velocity, i) + g;
        velocity[i] = store<T>(v);
        params[i] = store<T>(p - lr * (nesterov ? g + momentum * v : v));
    }
}

// Adam (decoupled = 0: L2 added to the gradient) or AdamW (decoupled = 1: params scaled first).
// From the host, in double before rounding to A: one_minus_beta1/2 = 1 - beta1/2 (1 - float(0.999)
// would be 1.3e-5 off), bias1 = 1 - beta1^step and bias2 = 1 - beta2^step.
template <typename T>
__global__ void adam_update(T* params, const T* grads, T* m, T* v, long long n, acc_t<T> lr,
                            acc_t<T> beta1, acc_t<T> beta2, acc_t<T> one_minus_beta1,
                            acc_t<T> one_minus_beta2, acc_t<T> eps, acc_t<T> weight_decay,
                            acc_t<T> bias1, acc_t<T> bias2, int decoupled) {
    using A = acc_t<T>;
    const A step_size = lr / bias1;
    for (long long i = global_thread(); i < n; i += grid_threads()) {
        A p = load(params, i);
        A g = load(grads, i);
        if (decoupled) {
            p *= A(1) - lr * weight_decay;
        } else {
            g += weight_decay * p;
        }
        const A mi = beta1 * load(m, i) + one_minus_beta1 * g;
        const A vi = beta2 * load(v, i) + one_minus_beta2 * g * g;
        m[i] = store<T>(mi);
        v[i] = store<T>(vi);
        params[i] = store<T>(p - step_size * mi / (sqrt(vi / bias2) + eps));
    }
}
