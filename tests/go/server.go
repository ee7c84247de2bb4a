// A Go net/http server for p99probe's tests. Besides serving HTTP, it runs two goroutines with
// known behaviour: one blocks its OS thread in main.stallHere (a raw nanosleep syscall, so the
// thread really goes off-CPU), one burns CPU in main.spinHere.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
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

var sink uint64

func main() {
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
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("ready %d\n", listener.Addr().(*net.TCPAddr).Port)
	go func() {
		time.Sleep(60 * time.Second)
		os.Exit(0)
	}()
	http.Serve(listener, nil)
}
