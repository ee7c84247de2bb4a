//! `p99probe-target`: processes whose behaviour p99probe's tests and demo control exactly.
//! Each mode prints `ready` (and for servers `ready PORT`) once it is doing what it says, and
//! stops by itself after `--duration` seconds (default 60) so nothing outlives a test run.
//!
//! Function names that tests look for are `#[inline(never)]` and built with frame pointers.

mod load;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: p99probe-target MODE [--duration SECS] [options]
modes:
  sleeper   [--stall-ms 20] [--threads 1] [--linger SECS] [--rename-after SECS]
                                     THREADS threads that sleep in stall_here() in a loop; with
                                     --linger, the process stays that long after they end; with
                                     --rename-after, each renames itself from stall-loop to
                                     stall-renamed that long after the ready line
  stacks    [--paths 20000] [--nap-us 200] [--depth D] [--repeat 1] [--nap-step-us 0]
                                     a thread that naps REPEAT times under each of PATHS
                                     distinct user stacks (call paths through path_zero/
                                     path_one, D deep; by default as deep as PATHS needs), in
                                     turn, the Nth path's naps NAP + N x STEP µs long. Paths
                                     that differ only above their last step block at one
                                     place: one instruction, at one stack depth
  spinner   [--start-after SECS]     a thread that burns CPU in spin_here(); with --start-after
                                     it is created that long after the ready line
  worker    [--cpu N]                bursts of CPU work (work_burst) with 1 ms sleeps, pinned
  hog       [--cpu N]                pure CPU hog, pinned
  jit                                a thread that spins in machine code it generated at run time
                                     (no file behind it), named in /tmp/perf-PID.map as a JIT
                                     (Java, Node, .NET) names its code for profilers
  duty      [--cpu N] [--busy-us 1000] [--period-us 50000]
                                     spins BUSY µs every PERIOD µs, pinned: a neighbour that
                                     uses a known share of a CPU (a benchmark calibration)
  server    [--port 0] [--response-bytes 4096] [--stall-every N --stall-ms M]
            [--inject-after SECS --inject-for SECS] [--backend PORT]
                                     TCP server speaking HTTP/1.1 (for wrk) or one-line requests;
                                     every Nth request stalls in stall_here() inside the window;
                                     with --backend, each request first makes a one-line call to
                                     the server on PORT (one outbound connection per connection)
  client    --port P [--conns 4]     request/response load against a server
  load      --port P [--conns 8] [--protocol http|redis]
                                     closed-loop load like wrk -t1 -cN (one thread, N keep-alive
                                     connections) that prints a `phase requests N ... p99_us X`
                                     line for each line read on stdin, and one at the end
  pingpong                           roundtrips --via pipe without the phases: a context-switch
                                     storm, for benchmarks
  syscalls                           one thread making cheap system calls as fast as it can (with
                                     p99probe's benchmark events: an event storm)
  roundtrips [--via pipe|tcp]        two threads handing a byte back and forth as fast as they
                                     can, through pipes or over one loopback TCP connection (to
                                     its own listening port: each round trip is a request); prints
                                     `phase roundtrips N seconds S` for each line read on stdin"
    );
    std::process::exit(2)
}

struct Opts {
    args: Vec<String>,
}

impl Opts {
    fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        self.args
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.args.get(i + 1))
            .map(|v| v.parse().unwrap_or_else(|_| usage()))
            .unwrap_or(default)
    }
}

fn ready(extra: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready{extra}");
    let _ = out.flush();
}

fn pin_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            panic!("sched_setaffinity({cpu}) failed");
        }
    }
}

/// nanosleep issued by a `syscall` instruction inside this function, so the user stack at the
/// block starts in `stall_here` itself. (Through libc's frameless wrapper, frame-pointer
/// unwinding would skip the function that called it.)
#[inline(never)]
#[no_mangle]
pub extern "C" fn stall_here(millis: u64) {
    nanosleep_in_caller(millis * 1_000_000);
}

/// nanosleep by a `syscall` instruction in the (inlining) caller's own frame.
#[inline(always)]
fn nanosleep_in_caller(nanos: u64) {
    let ts = libc::timespec {
        tv_sec: (nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
    };
    unsafe {
        let _ret: i64;
        std::arch::asm!(
            "syscall",
            inlateout("rax") libc::SYS_nanosleep => _ret,
            in("rdi") &ts as *const libc::timespec,
            in("rsi") 0usize,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
}

/// One step of a call path spelled by `bits` (low bit first): descends through `path_zero` or
/// `path_one` for each of `depth` bits and naps at the bottom, so every value of `bits` blocks
/// under a user stack of its own.
#[inline(always)]
fn descend(bits: u32, depth: u32, nap_ns: u64) {
    if depth == 0 {
        nanosleep_in_caller(nap_ns);
    } else if bits & 1 == 0 {
        path_zero(bits >> 1, depth - 1, nap_ns);
    } else {
        path_one(bits >> 1, depth - 1, nap_ns);
    }
    // Keeps each call a real call: a tail call would reuse the frame and merge the paths.
    std::hint::black_box(depth);
}

#[inline(never)]
#[no_mangle]
pub extern "C" fn path_zero(bits: u32, depth: u32, nap_ns: u64) {
    descend(bits, depth, nap_ns);
}

#[inline(never)]
#[no_mangle]
pub extern "C" fn path_one(bits: u32, depth: u32, nap_ns: u64) {
    descend(bits, depth, nap_ns);
}

#[inline(never)]
#[no_mangle]
pub extern "C" fn spin_here(iterations: u64) -> u64 {
    let mut x = 0x9e3779b97f4a7c15u64;
    for i in 0..iterations {
        x = std::hint::black_box(x.rotate_left(5) ^ i).wrapping_mul(0x100000001b3);
    }
    x
}

#[inline(never)]
#[no_mangle]
pub extern "C" fn work_burst(millis: u64) -> u64 {
    let end = Instant::now() + Duration::from_millis(millis);
    let mut acc = 0;
    while Instant::now() < end {
        acc ^= spin_here(1000);
    }
    acc
}

fn sleeper(opts: &Opts, until: Instant) {
    let stall_ms = opts.get("--stall-ms", 20u64);
    let rename_at = Some(opts.get("--rename-after", -1.0f64))
        .filter(|&secs| secs >= 0.0)
        .map(|secs| Instant::now() + Duration::from_secs_f64(secs));
    let handles: Vec<_> = (0..opts.get("--threads", 1u32))
        .map(|_| {
            std::thread::Builder::new()
                .name("stall-loop".into())
                .spawn(move || {
                    let mut rename_at = rename_at;
                    while Instant::now() < until {
                        stall_here(stall_ms);
                        if rename_at.is_some_and(|at| Instant::now() >= at) {
                            rename_at = None;
                            std::fs::write("/proc/thread-self/comm", "stall-renamed").unwrap();
                        }
                    }
                })
                .unwrap()
        })
        .collect();
    ready("");
    for handle in handles {
        handle.join().unwrap();
    }
    std::thread::sleep(Duration::from_secs_f64(opts.get("--linger", 0.0f64)));
}

fn distinct_stacks(opts: &Opts, until: Instant) {
    let paths = opts.get("--paths", 20_000u32);
    let nap_ns = opts.get("--nap-us", 200u64) * 1000;
    let depth = opts.get(
        "--depth",
        u32::BITS - paths.saturating_sub(1).leading_zeros(),
    );
    let repeat = opts.get("--repeat", 1u32);
    let nap_step_ns = opts.get("--nap-step-us", 0u64) * 1000;
    let handle = std::thread::Builder::new()
        .name("path-walker".into())
        .spawn(move || {
            for bits in 0..paths {
                let nap_ns = nap_ns + bits as u64 * nap_step_ns;
                for _ in 0..repeat {
                    if Instant::now() >= until {
                        return;
                    }
                    descend(bits, depth, nap_ns);
                }
            }
        })
        .unwrap();
    ready("");
    handle.join().unwrap();
}

fn spinner(opts: &Opts, until: Instant) {
    // With --start-after the thread is created that long after "ready": a probe attached at
    // "ready" must see threads that did not exist when it attached.
    let start_after = Duration::from_secs_f64(opts.get("--start-after", 0.0f64));
    if !start_after.is_zero() {
        ready("");
        std::thread::sleep(start_after);
    }
    let handle = std::thread::Builder::new()
        .name("spin-loop".into())
        .spawn(move || {
            while Instant::now() < until {
                std::hint::black_box(spin_here(1_000_000));
            }
        })
        .unwrap();
    if start_after.is_zero() {
        ready("");
    }
    handle.join().unwrap();
}

/// What `jit` generates, x86-64: a loop counting `rcx` down from 2^20 inside a frame of its
/// own (`push rbp; mov rbp, rsp`), so frame-pointer unwinding continues into its caller as it
/// does through a JIT's code built for profiling (Java's `-XX:+PreserveFramePointer`).
#[cfg(target_arch = "x86_64")]
const GENERATED_SPIN: [u8; 21] = [
    0x55, // push rbp
    0x48, 0x89, 0xe5, // mov rbp, rsp
    0x48, 0xb9, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // mov rcx, 1 << 20
    0x48, 0xff, 0xc9, // loop: dec rcx
    0x75, 0xfb, // jnz loop
    0x5d, // pop rbp
    0xc3, // ret
];

/// The name `jit` gives its generated code in its perf map.
const GENERATED_SPIN_NAME: &str = "jitted::spin_in_generated_code";

#[cfg(target_arch = "x86_64")]
fn jit(until: Instant) {
    let code = unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(page, libc::MAP_FAILED, "mmap");
        std::ptr::copy_nonoverlapping(
            GENERATED_SPIN.as_ptr(),
            page as *mut u8,
            GENERATED_SPIN.len(),
        );
        assert_eq!(
            libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC),
            0,
            "mprotect"
        );
        page
    };
    // The format perf defines (tools/perf/Documentation/jit-interface.txt): START SIZE name,
    // hex, one line per piece of code, appended as code is generated.
    let map_path = format!("/tmp/perf-{}.map", std::process::id());
    std::fs::write(
        &map_path,
        format!(
            "{:x} {:x} {GENERATED_SPIN_NAME}\n",
            code as usize,
            GENERATED_SPIN.len()
        ),
    )
    .unwrap();
    let generated: extern "C" fn() = unsafe { std::mem::transmute(code) };
    let spinner = std::thread::Builder::new()
        .name("jit-spin".into())
        .spawn(move || {
            while Instant::now() < until {
                run_generated_code(generated);
            }
        })
        .unwrap();
    ready("");
    spinner.join().unwrap();
    let _ = std::fs::remove_file(map_path);
}

#[cfg(not(target_arch = "x86_64"))]
fn jit(_until: Instant) {
    eprintln!("jit: generates x86-64 code only");
    std::process::exit(2);
}

#[inline(never)]
#[no_mangle]
pub extern "C" fn run_generated_code(generated: extern "C" fn()) {
    generated();
    std::hint::black_box(());
}

fn worker(opts: &Opts, until: Instant) {
    pin_to_cpu(opts.get("--cpu", 0usize));
    ready("");
    while Instant::now() < until {
        std::hint::black_box(work_burst(5));
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn hog(opts: &Opts, until: Instant) {
    pin_to_cpu(opts.get("--cpu", 0usize));
    ready("");
    while Instant::now() < until {
        std::hint::black_box(spin_here(1_000_000));
    }
}

fn duty(opts: &Opts, until: Instant) {
    pin_to_cpu(opts.get("--cpu", 0usize));
    let busy = Duration::from_micros(opts.get("--busy-us", 1000u64));
    let period = Duration::from_micros(opts.get("--period-us", 50_000u64));
    ready("");
    while Instant::now() < until {
        let start = Instant::now();
        while start.elapsed() < busy {
            std::hint::spin_loop();
        }
        std::thread::sleep(period.saturating_sub(start.elapsed()));
    }
}

struct Injection {
    stall_every: u64,
    stall_ms: u64,
    from: Instant,
    until: Instant,
}

impl Injection {
    fn active(&self) -> bool {
        let now = Instant::now();
        self.stall_every > 0 && now >= self.from && now < self.until
    }
}

/// Reads one request: an HTTP request (through its blank line) or a single line.
/// Returns whether it was HTTP, or None at end of stream.
fn read_request(reader: &mut impl BufRead, line: &mut String) -> Option<bool> {
    line.clear();
    match reader.read_line(line) {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    if !line.starts_with("GET ") {
        return Some(false);
    }
    loop {
        line.clear();
        match reader.read_line(line) {
            Ok(0) | Err(_) => return None,
            Ok(_) if line == "\r\n" || line == "\n" => return Some(true),
            Ok(_) => {}
        }
    }
}

/// A blocking request/response round trip to a backend, as a server calling its database does.
#[inline(never)]
fn call_backend(backend: &mut BufReader<TcpStream>, reply: &mut Vec<u8>) -> bool {
    reply.clear();
    backend.get_mut().write_all(b"GET\n").is_ok()
        && matches!(backend.read_until(b'\n', reply), Ok(n) if n > 0)
}

fn serve_connection(stream: TcpStream, body: &[u8], injection: &Injection, backend_port: u16) {
    let mut backend = match backend_port {
        0 => None,
        port => match TcpStream::connect(("127.0.0.1", port)) {
            Ok(connection) => Some(BufReader::new(connection)),
            Err(_) => return,
        },
    };
    let mut backend_reply = Vec::new();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    let mut served = 0u64;
    let header = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n",
        body.len()
    );
    let mut http_response = header.into_bytes();
    http_response.extend_from_slice(body);
    while let Some(http) = read_request(&mut reader, &mut line) {
        served += 1;
        if let Some(backend) = backend.as_mut() {
            if !call_backend(backend, &mut backend_reply) {
                return;
            }
        }
        if injection.active() && served.is_multiple_of(injection.stall_every) {
            stall_here(injection.stall_ms);
        }
        let response = if http { &http_response[..] } else { body };
        if writer.write_all(response).is_err() {
            return;
        }
    }
}

fn server(opts: &Opts, until: Instant) {
    let port = opts.get("--port", 0u16);
    let bytes = opts.get("--response-bytes", 4096usize);
    let start = Instant::now();
    let injection: &'static Injection = Box::leak(Box::new(Injection {
        stall_every: opts.get("--stall-every", 0u64),
        stall_ms: opts.get("--stall-ms", 20u64),
        from: start + Duration::from_secs_f64(opts.get("--inject-after", 0.0f64)),
        until: start
            + Duration::from_secs_f64(
                opts.get("--inject-for", 1e6f64) + opts.get("--inject-after", 0.0f64),
            ),
    }));
    let backend_port = opts.get("--backend", 0u16);
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let port = listener.local_addr().unwrap().port();
    let mut body = vec![b'x'; bytes.max(1)];
    *body.last_mut().unwrap() = b'\n';
    let body: &'static [u8] = Box::leak(body.into_boxed_slice());
    std::thread::spawn(move || {
        let left = until.saturating_duration_since(Instant::now());
        std::thread::sleep(left);
        std::process::exit(0);
    });
    ready(&format!(" {port}"));
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || serve_connection(stream, body, injection, backend_port));
    }
}

fn client(opts: &Opts, until: Instant) {
    let port: u16 = opts.get("--port", 0u16);
    if port == 0 {
        usage();
    }
    let conns = opts.get("--conns", 4usize);
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            std::thread::spawn(move || {
                let mut requests = 0u64;
                while Instant::now() < until {
                    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    let mut line = Vec::new();
                    while Instant::now() < until {
                        if writer.write_all(b"GET\n").is_err() {
                            break;
                        }
                        line.clear();
                        match reader.by_ref().read_until(b'\n', &mut line) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => requests += 1,
                        }
                    }
                }
                requests
            })
        })
        .collect();
    ready("");
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    println!("requests {total}");
}

/// A byte back and forth between two threads of this process, through `via`; with
/// `report_phases`, the round trips are counted in phases that stdin ends (a benchmark's
/// per-event cost: run the process on one CPU, and each round trip is two context switches
/// and two wakeups there). Prints the round trips made when it ends.
fn roundtrips(via: &str, report_phases: bool, until: Instant) {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    // Kept open for the whole run: a connection counts as a server's (its requests timed)
    // only while its port is one the process listens on.
    let mut listening = None;
    // The two ends: (ours to write, ours to read) and the echo thread's (read, write).
    let (ours, theirs): ((OwnedFd, OwnedFd), (OwnedFd, OwnedFd)) = match via {
        "pipe" => {
            let pipe = || {
                let mut fds = [0i32; 2];
                assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
                use std::os::fd::FromRawFd;
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
            };
            let (to_echo_read, to_echo_write) = pipe();
            let (back_read, back_write) = pipe();
            ((to_echo_write, back_read), (to_echo_read, back_write))
        }
        "tcp" => {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            listening = Some(listener);
            for stream in [&client, &server] {
                stream.set_nodelay(true).expect("TCP_NODELAY");
            }
            let (client, server) = (OwnedFd::from(client), OwnedFd::from(server));
            (
                (client.try_clone().unwrap(), client),
                (server.try_clone().unwrap(), server),
            )
        }
        _ => usage(),
    };
    std::thread::spawn(move || {
        let (read_fd, write_fd) = (theirs.0.as_raw_fd(), theirs.1.as_raw_fd());
        let mut byte = [0u8; 1];
        while unsafe { libc::read(read_fd, byte.as_mut_ptr().cast(), 1) } == 1 {
            if unsafe { libc::write(write_fd, byte.as_ptr().cast(), 1) } != 1 {
                return;
            }
        }
    });
    let done = Arc::new(AtomicU64::new(0));
    if report_phases {
        let counted = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut last = (Instant::now(), counted.load(Ordering::Relaxed));
            for _ in std::io::stdin().lines() {
                let now = (Instant::now(), counted.load(Ordering::Relaxed));
                println!(
                    "phase roundtrips {} seconds {:.6}",
                    now.1 - last.1,
                    (now.0 - last.0).as_secs_f64()
                );
                last = now;
            }
        });
    }
    ready("");
    let (write_fd, read_fd) = (ours.0.as_raw_fd(), ours.1.as_raw_fd());
    let mut byte = [0u8; 1];
    'rounds: while Instant::now() < until {
        for _ in 0..256 {
            unsafe {
                if libc::write(write_fd, byte.as_ptr().cast(), 1) != 1
                    || libc::read(read_fd, byte.as_mut_ptr().cast(), 1) != 1
                {
                    break 'rounds;
                }
            }
        }
        done.fetch_add(256, Ordering::Relaxed);
    }
    println!("rounds {}", done.load(Ordering::Relaxed));
    drop(listening);
}

fn syscall_storm(until: Instant) {
    ready("");
    let mut calls = 0u64;
    while Instant::now() < until {
        for _ in 0..10_000 {
            // getppid: a real system call (glibc does not cache it) that does almost nothing.
            std::hint::black_box(unsafe { libc::getppid() });
        }
        calls += 10_000;
    }
    println!("calls {calls}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first().cloned() else {
        usage()
    };
    let opts = Opts { args };
    let until = Instant::now() + Duration::from_secs_f64(opts.get("--duration", 60.0f64));
    match mode.as_str() {
        "sleeper" => sleeper(&opts, until),
        "spinner" => spinner(&opts, until),
        "stacks" => distinct_stacks(&opts, until),
        "worker" => worker(&opts, until),
        "hog" => hog(&opts, until),
        "jit" => jit(until),
        "duty" => duty(&opts, until),
        "server" => server(&opts, until),
        "client" => client(&opts, until),
        "load" => {
            let port: u16 = opts.get("--port", 0u16);
            let protocol = load::Protocol::parse(&opts.get("--protocol", "http".to_string()))
                .unwrap_or_else(|| usage());
            if port == 0 {
                usage();
            }
            load::run(port, opts.get("--conns", 8usize), protocol, until)
        }
        "pingpong" => roundtrips("pipe", false, until),
        "syscalls" => syscall_storm(until),
        "roundtrips" => roundtrips(&opts.get("--via", "pipe".to_string()), true, until),
        _ => usage(),
    }
}
