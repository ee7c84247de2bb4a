use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = p99probe::cli::Cli::parse();
    if let Err(err) = p99probe::cli::run(cli) {
        // One line: the outermost message plus its causes.
        let causes: Vec<String> = err.chain().skip(1).map(|c| c.to_string()).collect();
        if causes.is_empty() {
            eprintln!("p99probe: {err}");
        } else {
            eprintln!("p99probe: {err}: {}", causes.join(": "));
        }
        std::process::exit(1);
    }
}
