//! `sails`: a thin command line over the library. Each subcommand lives in `cli/<name>.rs`.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", describe(&err));
            std::process::ExitCode::from(2)
        }
    }
}

/// The error and its causes, outermost first, leaving out a cause whose text the message
/// already holds (the library's errors quote their source, e.g. a path and the OS error).
fn describe(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
