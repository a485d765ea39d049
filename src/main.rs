//! lunmirror daemon entry point (wiring only).
fn main() {
    tracing_subscriber::fmt::init();
}
