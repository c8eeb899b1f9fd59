//! The start-up every binary runs first thing in `main`: the CPU thread count candle and
//! rayon use, the malloc arena policy, and logging (`tracing`, env filter `RUST_LOG`,
//! default `info`, to stderr, colour only on a terminal).
//!
//! Why this order, and why before any thread exists: fixing the thread count writes an
//! environment variable (`RAYON_NUM_THREADS`), which is only sound while no other thread
//! may read the environment; the arena setting applies only to allocations made after it,
//! so it precedes every other thread's first allocation; logging starts no thread and
//! needs neither, so it comes last. A binary that builds a tokio runtime calls [`init`]
//! before building it.

/// What differs between the binaries' start-up.
#[derive(Debug, Clone, Copy)]
pub struct Startup {
    /// Every thread allocates from one glibc arena
    /// ([`memory::use_one_malloc_arena`](crate::memory::use_one_malloc_arena)): the trainer
    /// runs many backward passes on rayon workers and keeps its peak resident set down this
    /// way. Off for the reference server and the evaluator, whose memory with one arena has
    /// not been measured: they also allocate on the async runtime's threads (decoding and
    /// answering requests while a pass runs), which would then contend for the one arena's
    /// lock.
    pub one_malloc_arena: bool,
}

impl Startup {
    /// The trainer's start-up.
    pub const TRAINER: Startup = Startup { one_malloc_arena: true };
    /// `ref-server` and `dpo-eval`.
    pub const SERVER: Startup = Startup { one_malloc_arena: false };
}

/// Runs the start-up steps. Call it first thing in `main`, before any thread exists (in
/// particular before a tokio runtime is built), and once.
pub fn init(startup: Startup) {
    crate::model::ops::fix_thread_count();
    if startup.one_malloc_arena {
        crate::memory::use_one_malloc_arena();
    }
    init_logging();
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
