// A Go net/http server with injectable misbehaviour, for p99probe's tests and demo.
//
//	-background        also run a goroutine that sleeps in main.stallHere and one that spins in
//	                   main.spinHere, forever (for stack and symbolization tests)
//	-stall-every N -stall-ms M   every Nth request sleeps M ms in main.stallHere (a raw
//	                   nanosleep, so the OS thread really goes off-CPU)
//	-spin-every N -spin-ms M     every Nth request burns M ms of CPU in main.spinHere
//	-alloc-every N -alloc-kb K   every Nth request allocates K KiB of pointer-rich garbage in
//	                   main.allocHere (with -live-mb of long-lived objects to mark and a low
//	                   GOGC, this makes GC the cause of a spike)
//	-live-mb M         keep M MiB of long-lived, pointer-rich objects
//	-inject-after D -inject-for D  misbehave only inside this window after start
//
// It prints "ready PORT" once listening and exits by itself after -lifetime.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"syscall"
	"time"
)

//go:noinline
func stallHere(d time.Duration) {
	ts := syscall.NsecToTimespec(int64(d))
	syscall.Nanosleep(&ts, nil)
}

//go:noinline
func spinHere(n int) uint64 {
	x := uint64(0x9e3779b97f4a7c15)
	for i := 0; i < n; i++ {
		x = (x<<5 | x>>59) ^ uint64(i)
		x *= 0x100000001b3
	}
	return x
}

//go:noinline
func spinFor(d time.Duration) uint64 {
	end := time.Now().Add(d)
	var x uint64
	for time.Now().Before(end) {
		x += spinHere(10_000)
	}
	return x
}

var sink uint64

type node struct {
	next    *node
	payload [48]byte
}

var live []*node

//go:noinline
func allocHere(kb int) int {
	garbage := make([]*node, 0, kb*1024/64)
	for i := 0; i < cap(garbage); i++ {
		garbage = append(garbage, &node{})
		if i > 0 {
			garbage[i].next = garbage[i-1]
		}
	}
	return len(garbage)
}

func main() {
	background := flag.Bool("background", false, "run the background stall and spin goroutines")
	stallEvery := flag.Int64("stall-every", 0, "every Nth request stalls")
	stallMs := flag.Int("stall-ms", 20, "stall length")
	spinEvery := flag.Int64("spin-every", 0, "every Nth request spins")
	spinMs := flag.Int("spin-ms", 10, "spin length")
	allocEvery := flag.Int64("alloc-every", 0, "every Nth request allocates")
	allocKb := flag.Int("alloc-kb", 256, "allocation size")
	liveMb := flag.Int("live-mb", 0, "long-lived heap to keep")
	injectAfter := flag.Duration("inject-after", 0, "start misbehaving after this long")
	injectFor := flag.Duration("inject-for", time.Hour, "misbehave for this long")
	lifetime := flag.Duration("lifetime", 60*time.Second, "exit after this long")
	flag.Parse()

	for i := 0; i < *liveMb*1024*1024/64; i++ {
		n := &node{}
		if i > 0 {
			n.next = live[i-1]
		}
		live = append(live, n)
	}
	start := time.Now()
	injecting := func() bool {
		since := time.Since(start)
		return since >= *injectAfter && since < *injectAfter+*injectFor
	}
	if *background {
		go func() {
			for {
				stallHere(20 * time.Millisecond)
			}
		}()
		go func() {
			for {
				sink += spinHere(1_000_000)
				time.Sleep(time.Millisecond)
			}
		}()
	}
	var requests int64
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		n := atomic.AddInt64(&requests, 1)
		if injecting() {
			if *stallEvery > 0 && n%*stallEvery == 0 {
				stallHere(time.Duration(*stallMs) * time.Millisecond)
			}
			if *spinEvery > 0 && n%*spinEvery == 0 {
				atomic.AddUint64(&sink, spinFor(time.Duration(*spinMs)*time.Millisecond))
			}
			if *allocEvery > 0 && n%*allocEvery == 0 {
				atomic.AddUint64(&sink, uint64(allocHere(*allocKb)))
			}
		}
		fmt.Fprintln(w, "ok")
	})
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("ready %d\n", listener.Addr().(*net.TCPAddr).Port)
	go func() {
		time.Sleep(*lifetime)
		os.Exit(0)
	}()
	http.Serve(listener, nil)
}
