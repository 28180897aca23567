use std::process::ExitCode;

fn main() -> ExitCode {
    match kiln::cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
