//! `load`: a closed-loop load generator, like `wrk -t1 -cN` (one thread, N keep-alive
//! connections, each sending its next request as soon as the last response is in), that reports
//! latency percentiles per phase instead of once at exit.
//!
//! wrk and redis-benchmark print percentiles only when they finish, so a benchmark that
//! alternates "nothing attached" and "tool attached" under one continuous load can compare
//! throughput between phases (from the server's write count) but not P99. Here every line
//! read on stdin ends a phase: the generator prints the phase's count and percentiles and
//! starts the next one from empty.
//!
//! Latency is measured from just before a request is written to just after its response is
//! read. Being closed-loop, it shares wrk's coordinated omission: while the server stalls, no
//! new requests are sent, so a stall is counted once per connection rather than once per
//! request that would have arrived. That is what wrk users see too, and it is the same in
//! every phase, which is all an overhead comparison needs.

use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What the connections speak.
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    /// `GET /` over HTTP/1.1 keep-alive; responses must carry Content-Length.
    Http,
    /// redis `GET key:__rand_int__`, the request `redis-benchmark -t get` sends.
    Redis,
}

impl Protocol {
    pub fn parse(name: &str) -> Option<Protocol> {
        match name {
            "http" => Some(Protocol::Http),
            "redis" => Some(Protocol::Redis),
            _ => None,
        }
    }

    fn request(self) -> &'static [u8] {
        match self {
            Protocol::Http => b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            Protocol::Redis => b"*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n",
        }
    }

    /// Reads one whole response, so the next request is not sent before it is in.
    async fn read_response<R: AsyncBufReadExt + Unpin>(
        self,
        reader: &mut R,
        line: &mut String,
        body: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let malformed = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        match self {
            Protocol::Http => {
                let mut content_length = None;
                read_line_or_eof(reader, line).await?;
                if !line.starts_with("HTTP/1.") {
                    return Err(malformed(format!("not an HTTP response: {line:?}")));
                }
                loop {
                    read_line_or_eof(reader, line).await?;
                    let header = line.trim_end();
                    if header.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            content_length = value.trim().parse::<usize>().ok();
                        }
                    }
                }
                let length = content_length
                    .ok_or_else(|| malformed("an HTTP response without Content-Length".into()))?;
                body.resize(length, 0);
                reader.read_exact(body).await?;
            }
            Protocol::Redis => {
                read_line_or_eof(reader, line).await?;
                match line.as_bytes().first() {
                    Some(b'+' | b'-' | b':') => {}
                    Some(b'$') => {
                        let length: i64 = line[1..]
                            .trim_end()
                            .parse()
                            .map_err(|_| malformed(format!("bad bulk length: {line:?}")))?;
                        if length >= 0 {
                            body.resize(length as usize + 2, 0);
                            reader.read_exact(body).await?;
                        }
                    }
                    _ => return Err(malformed(format!("unexpected redis reply: {line:?}"))),
                }
            }
        }
        Ok(())
    }
}

/// One line into `line`; the peer closing the connection is an error, not an empty line.
async fn read_line_or_eof<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    line: &mut String,
) -> std::io::Result<()> {
    line.clear();
    if reader.read_line(line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// What the connections have measured since the last phase ended.
struct PhaseCounters {
    latencies_ns: RefCell<Histogram<u64>>,
    errors: Cell<u64>,
}

impl PhaseCounters {
    fn new() -> PhaseCounters {
        PhaseCounters {
            // 1 ns to 1 h at 3 significant figures; values beyond are clamped, not lost.
            latencies_ns: RefCell::new(
                Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("histogram bounds"),
            ),
            errors: Cell::new(0),
        }
    }

    /// The finished phase as one line, `phase requests N seconds S errors E p50_us ...`,
    /// and the counters emptied for the next.
    fn take_report(&self, seconds: f64) -> String {
        let mut latencies = self.latencies_ns.borrow_mut();
        let micros = |quantile: f64| latencies.value_at_quantile(quantile) as f64 / 1000.0;
        let line = format!(
            "phase requests {} seconds {seconds:.3} errors {} p50_us {:.1} p90_us {:.1} p99_us {:.1} p999_us {:.1} max_us {:.1}",
            latencies.len(),
            self.errors.get(),
            micros(0.5),
            micros(0.9),
            micros(0.99),
            micros(0.999),
            latencies.max() as f64 / 1000.0,
        );
        latencies.reset();
        self.errors.set(0);
        line
    }
}

/// One connection's request/response loop until `until`, reconnecting after errors.
async fn drive_connection(
    port: u16,
    protocol: Protocol,
    counters: Rc<PhaseCounters>,
    until: Instant,
) {
    let (mut line, mut body) = (String::new(), Vec::new());
    while Instant::now() < until {
        let result: std::io::Result<()> = async {
            let stream = TcpStream::connect(("127.0.0.1", port)).await?;
            stream.set_nodelay(true)?;
            let (read_half, mut write_half) = stream.into_split();
            let mut reader = BufReader::new(read_half);
            while Instant::now() < until {
                let sent = Instant::now();
                write_half.write_all(protocol.request()).await?;
                protocol
                    .read_response(&mut reader, &mut line, &mut body)
                    .await?;
                let nanos = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
                counters.latencies_ns.borrow_mut().saturating_record(nanos);
            }
            Ok(())
        }
        .await;
        if let Err(error) = result {
            counters.errors.set(counters.errors.get() + 1);
            eprintln!("load: connection to port {port}: {error}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs `conns` connections against 127.0.0.1:`port` until `until`, printing a phase report
/// for every line read on stdin and a last one at the end.
pub fn run(port: u16, conns: usize, protocol: Protocol, until: Instant) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the load generator's runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let counters = Rc::new(PhaseCounters::new());
        for _ in 0..conns {
            tokio::task::spawn_local(drive_connection(port, protocol, counters.clone(), until));
        }
        crate::ready("");
        let mut phase_start = Instant::now();
        let mut end_phase = |now: Instant| {
            println!(
                "{}",
                counters.take_report((now - phase_start).as_secs_f64())
            );
            phase_start = now;
        };
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        let mut stdin_open = true;
        let deadline = tokio::time::sleep_until(until.into());
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                line = stdin.next_line(), if stdin_open => match line {
                    Ok(Some(_)) => end_phase(Instant::now()),
                    // Without a controller the phases are simply the whole run.
                    Ok(None) | Err(_) => stdin_open = false,
                },
                _ = &mut deadline => break,
            }
        }
        end_phase(Instant::now());
    });
    // The stdin reader blocks in a thread of its own; do not wait for it.
    runtime.shutdown_background();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads responses from `wire` until it is used up; returns how many were whole.
    async fn responses_in(protocol: Protocol, wire: &[u8]) -> std::io::Result<usize> {
        let mut reader = BufReader::new(wire);
        let (mut line, mut body, mut count) = (String::new(), Vec::new(), 0);
        while !reader.fill_buf().await?.is_empty() {
            protocol
                .read_response(&mut reader, &mut line, &mut body)
                .await?;
            count += 1;
        }
        Ok(count)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn redis_replies_are_read_whole_including_bulk_bodies_with_crlf_inside() {
        let wire = b"$-1\r\n$4\r\na\r\nb\r\n+OK\r\n:42\r\n-ERR wrong\r\n";
        assert_eq!(responses_in(Protocol::Redis, wire).await.unwrap(), 5);
        let truncated = responses_in(Protocol::Redis, b"$10\r\nshort\r\n").await;
        assert!(truncated.is_err());
        let array = responses_in(Protocol::Redis, b"*1\r\n$1\r\na\r\n").await;
        assert!(array
            .unwrap_err()
            .to_string()
            .contains("unexpected redis reply"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn http_responses_are_read_through_their_content_length() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nX: y\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(responses_in(Protocol::Http, wire).await.unwrap(), 2);
        let chunked = responses_in(
            Protocol::Http,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await;
        assert!(chunked.unwrap_err().to_string().contains("Content-Length"));
        let garbage = responses_in(Protocol::Http, b"+PONG\r\n").await;
        assert!(garbage
            .unwrap_err()
            .to_string()
            .contains("not an HTTP response"));
    }

    #[test]
    fn a_phase_report_gives_the_phase_alone_and_starts_the_next_from_empty() {
        let counters = PhaseCounters::new();
        counters.errors.set(1);
        for micros in 1..=1000u64 {
            counters
                .latencies_ns
                .borrow_mut()
                .saturating_record(micros * 1000);
        }
        let report = counters.take_report(2.0);
        let field = |name: &str| -> f64 {
            let words: Vec<&str> = report.split_whitespace().collect();
            let at = words.iter().position(|w| *w == name).unwrap();
            words[at + 1].parse().unwrap()
        };
        assert!(
            report.starts_with("phase requests 1000 seconds 2.000 errors 1 "),
            "{report}"
        );
        assert!((field("p50_us") - 500.0).abs() <= 1.0, "{report}");
        assert!((field("p99_us") - 990.0).abs() <= 1.0, "{report}");
        assert!((field("max_us") - 1000.0).abs() <= 1.0, "{report}");
        let next = counters.take_report(1.0);
        assert!(
            next.starts_with("phase requests 0 seconds 1.000 errors 0 "),
            "{next}"
        );
    }
}
