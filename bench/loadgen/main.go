// loadgen: an open-loop HTTP load generator at a fixed request rate.
//
// Request i is scheduled at start + i/rate whatever happened to earlier
// requests, and its latency is measured from that scheduled time to the end
// of the response body, so a stalled server shows up as latency instead of as
// fewer requests sent (no coordinated omission, as in wrk2). Each request
// takes the next line of the targets file, "URL<TAB>bearer token[<TAB>group]",
// round robin, so many users with their own tokens can be replayed (oha and
// wrk send one header set for all requests); latencies are also reported per
// group (say ordinary and heavy users' feeds) of the same run. Standard
// library only: built by bench/bench_serving.py with the local Go toolchain,
// nothing downloaded.
//
//	loadgen -targets targets.tsv -rate 2000 -duration 20s -conns 64 > result.json
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
)

type target struct {
	url, token, group string
}

type groupResult struct {
	Completed int            `json:"completed"`
	Errors    int            `json:"errors"`
	Statuses  map[string]int `json:"statuses"`
	P50Ms     float64        `json:"p50_ms"`
	P99Ms     float64        `json:"p99_ms"`
	MaxMs     float64        `json:"max_ms"`
}

type result struct {
	Rate         float64                `json:"rate"`
	DurationS    float64                `json:"duration_s"`
	Sent         int                    `json:"sent"`
	Completed    int                    `json:"completed"`
	Errors       int                    `json:"errors"`
	Statuses     map[string]int         `json:"statuses"`
	AchievedRPS  float64                `json:"achieved_rps"`
	P50Ms        float64                `json:"p50_ms"`
	P90Ms        float64                `json:"p90_ms"`
	P99Ms        float64                `json:"p99_ms"`
	P999Ms       float64                `json:"p999_ms"`
	MaxMs        float64                `json:"max_ms"`
	MaxSendLagMs float64                `json:"max_send_lag_ms"`
	FirstError   string                 `json:"first_error,omitempty"`
	Groups       map[string]groupResult `json:"groups,omitempty"`
}

func readTargets(path string) ([]target, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []target
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		url, rest, _ := strings.Cut(line, "\t")
		token, group, _ := strings.Cut(rest, "\t")
		out = append(out, target{url, token, group})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no targets in %s", path)
	}
	return out, sc.Err()
}

func percentile(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return float64(sorted[i].Microseconds()) / 1000
}

func main() {
	targetsPath := flag.String("targets", "", "file of URL<TAB>token lines")
	rate := flag.Float64("rate", 1000, "requests per second (open loop)")
	duration := flag.Duration("duration", 10*time.Second, "how long to send")
	conns := flag.Int("conns", 64, "maximum connections (keep-alive)")
	timeout := flag.Duration("timeout", 5*time.Second, "per-request timeout")
	flag.Parse()
	targets, err := readTargets(*targetsPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	transport := &http.Transport{
		MaxIdleConns: *conns, MaxIdleConnsPerHost: *conns, MaxConnsPerHost: *conns,
		DialContext:        (&net.Dialer{Timeout: time.Second}).DialContext,
		DisableCompression: true,
	}
	client := &http.Client{Transport: transport, Timeout: *timeout}
	total := int(*rate * duration.Seconds())
	interval := time.Duration(float64(time.Second) / *rate)

	var mu sync.Mutex
	var wg sync.WaitGroup
	latencies := make([]time.Duration, 0, total)
	statuses := map[string]int{}
	byGroup := map[string][]time.Duration{}
	groupStatuses := map[string]map[string]int{}
	groupErrors := map[string]int{}
	errors := 0
	firstError := ""
	var maxLag time.Duration

	start := time.Now().Add(50 * time.Millisecond)
	for i := 0; i < total; i++ {
		scheduled := start.Add(time.Duration(i) * interval)
		if d := time.Until(scheduled); d > 0 {
			time.Sleep(d)
		} else if -d > maxLag {
			maxLag = -d
		}
		t := targets[i%len(targets)]
		wg.Add(1)
		go func(t target, scheduled time.Time) {
			defer wg.Done()
			req, _ := http.NewRequest("GET", t.url, nil)
			if t.token != "" {
				req.Header.Set("Authorization", "Bearer "+t.token)
			}
			resp, err := client.Do(req)
			status := ""
			if err == nil {
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				status = fmt.Sprint(resp.StatusCode)
			}
			elapsed := time.Since(scheduled)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errors++
				groupErrors[t.group]++
				if firstError == "" {
					firstError = err.Error()
				}
				return
			}
			statuses[status]++
			latencies = append(latencies, elapsed)
			if t.group != "" {
				byGroup[t.group] = append(byGroup[t.group], elapsed)
				if groupStatuses[t.group] == nil {
					groupStatuses[t.group] = map[string]int{}
				}
				groupStatuses[t.group][status]++
			}
		}(t, scheduled)
	}
	sendEnd := time.Now()
	wg.Wait()
	sort.Slice(latencies, func(a, b int) bool { return latencies[a] < latencies[b] })
	elapsed := sendEnd.Sub(start).Seconds()
	res := result{
		Rate: *rate, DurationS: elapsed, Sent: total, Completed: len(latencies), Errors: errors,
		Statuses: statuses, AchievedRPS: float64(len(latencies)) / elapsed,
		P50Ms: percentile(latencies, 0.50), P90Ms: percentile(latencies, 0.90),
		P99Ms: percentile(latencies, 0.99), P999Ms: percentile(latencies, 0.999),
		MaxMs: percentile(latencies, 1.0), MaxSendLagMs: float64(maxLag.Microseconds()) / 1000,
		FirstError: firstError,
	}
	if len(byGroup) > 0 {
		res.Groups = map[string]groupResult{}
		for g, ls := range byGroup {
			sort.Slice(ls, func(a, b int) bool { return ls[a] < ls[b] })
			res.Groups[g] = groupResult{Completed: len(ls), Errors: groupErrors[g],
				Statuses: groupStatuses[g], P50Ms: percentile(ls, 0.50),
				P99Ms: percentile(ls, 0.99), MaxMs: percentile(ls, 1.0)}
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(res); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}
