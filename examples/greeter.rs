//! An application that embeds monodon: one binary that is both the server
//! and its own worker.
//!
//! ```sh
//! cargo build --release --example greeter
//! target/release/examples/greeter serve --listen 127.0.0.1:8080 --workers 4
//! curl 'http://127.0.0.1:8080/?name=Ada'
//! ```

use std::process::ExitCode;

use monodon::{Request, Response};

/// Whatever the app needs once per worker (config, pools) is built here,
/// before the worker tells the supervisor it is ready.
struct Greeter {
    greeting: String,
}

impl monodon::App for Greeter {
    fn call(&mut self, req: &mut Request<'_>) -> Response {
        let name = req.query_param("name").unwrap_or("world");
        Response::text(200, format!("{}, {}! (worker {})\n", self.greeting, name, req.worker.pid))
    }
}

fn main() -> ExitCode {
    monodon::main_with(|| Greeter { greeting: std::env::var("GREETING").unwrap_or_else(|_| "Hello".into()) })
}
