package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
)

// Metrics is a scrape of a Prometheus text endpoint: each sample's value by
// its series ("name" or "name{label="v",...}" as exposed).
type Metrics map[string]float64

// ParseMetrics parses the Prometheus text exposition format (comments and
// timestamps ignored).
func ParseMetrics(r io.Reader) (Metrics, error) {
	m := Metrics{}
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		// The series ends at the first space outside the label braces.
		end := strings.IndexByte(line, '}')
		if end < 0 {
			end = 0
		}
		sp := strings.IndexByte(line[end:], ' ')
		if sp < 0 {
			return nil, fmt.Errorf("parse metrics: bad line %q", line)
		}
		series, rest := line[:end+sp], strings.Fields(line[end+sp:])
		if len(rest) == 0 {
			return nil, fmt.Errorf("parse metrics: no value in %q", line)
		}
		v, err := strconv.ParseFloat(rest[0], 64)
		if err != nil {
			return nil, fmt.Errorf("parse metrics: %q: %w", line, err)
		}
		m[series] = v
	}
	return m, s.Err()
}

// Get returns the sum of the samples of metric name whose labels include
// every given label="value" pair (e.g. `kind="mirror"`), and whether any
// matched.
func (m Metrics) Get(name string, labels ...string) (float64, bool) {
	sum, found := 0.0, false
	for series, v := range m {
		n, lbl, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		ok := true
		for _, want := range labels {
			if !strings.Contains(lbl, want) {
				ok = false
			}
		}
		if ok {
			sum += v
			found = true
		}
	}
	return sum, found
}

// Scrape fetches and parses url with client.
func Scrape(ctx context.Context, client *http.Client, url string) (Metrics, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: %s", url, resp.Status)
	}
	return ParseMetrics(resp.Body)
}

// Names lists the distinct metric names starting with prefix, sorted.
func (m Metrics) Names(prefix string) string {
	seen := map[string]bool{}
	for series := range m {
		n, _, _ := strings.Cut(series, "{")
		if strings.HasPrefix(n, prefix) {
			seen[n] = true
		}
	}
	return strings.Join(sortedKeys(seen), ", ")
}
