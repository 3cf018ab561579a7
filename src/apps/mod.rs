//! The apps built into the `monodon` binary (`monodon serve --app NAME`).

mod echo;
mod hello;
mod static_files;

use std::path::PathBuf;

use clap::ValueEnum;
use monodon_worker::{App, Request, Response};

pub use echo::Echo;
pub use hello::hello;
pub use static_files::StaticFiles;

/// Which built-in app the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AppName {
    /// Files under --root: Content-Type, Last-Modified, Range, index.html.
    Static,
    /// `200 hello\n` to everything: for benchmarks.
    Hello,
    /// Describes each request back as JSON: for diagnostics and tests.
    Echo,
}

impl AppName {
    pub fn as_str(self) -> &'static str {
        match self {
            AppName::Static => "static",
            AppName::Hello => "hello",
            AppName::Echo => "echo",
        }
    }
}

/// One of the built-in apps, ready to run in a worker.
pub enum BuiltIn {
    Static(StaticFiles),
    Hello,
    Echo(Echo),
}

impl BuiltIn {
    pub fn new(name: AppName, root: PathBuf) -> std::io::Result<BuiltIn> {
        Ok(match name {
            AppName::Static => BuiltIn::Static(StaticFiles::new(root)?),
            AppName::Hello => BuiltIn::Hello,
            AppName::Echo => BuiltIn::Echo(Echo::default()),
        })
    }
}

impl App for BuiltIn {
    fn call(&mut self, req: &mut Request<'_>) -> Response {
        match self {
            BuiltIn::Static(s) => s.call(req),
            BuiltIn::Hello => hello(req),
            BuiltIn::Echo(e) => e.call(req),
        }
    }

    fn preload(&mut self) {
        if let BuiltIn::Echo(e) = self {
            e.preload();
        }
    }

    fn init_worker(&mut self) {
        if let BuiltIn::Echo(e) = self {
            e.init_worker();
        }
    }
}
