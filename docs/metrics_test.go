// Package docs_test checks the operator documentation against the code.
package docs_test

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// metric is one metric as the code defines it or metrics.md lists it.
type metric struct {
	kind   string // metrics.md only: counter | gauge
	labels []string
}

var (
	// prometheus.NewDesc("name", "help", nil | []string{...}, ...)
	descRe = regexp.MustCompile(`NewDesc\(\s*"(doppel_[a-z0-9_]+)",\s*"(?:[^"\\]|\\.)*",\s*(?:nil|\[\]string\{([^}]*)\})`)
	// prometheus.NewCounterVec(prometheus.CounterOpts{Name: "name", ...}, []string{...})
	optsRe = regexp.MustCompile(`Opts\{\s*Name:\s*"(doppel_[a-z0-9_]+)",[^}]*\},\s*\[\]string\{([^}]*)\}`)
	rowRe  = regexp.MustCompile("(?m)^\\| `(doppel_[a-z0-9_]+)` \\| (counter|gauge) \\|([^|]*)\\|")
	nameRe = regexp.MustCompile(`doppel_[a-z0-9_]+`)
)

func labelList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.Trim(strings.TrimSpace(f), `"`); f != "" {
			out = append(out, f)
		}
	}
	slices.Sort(out)
	return out
}

// codeMetrics scans the module's production Go files for the metrics
// they define.
func codeMetrics(t *testing.T) map[string]metric {
	t.Helper()
	out := map[string]metric{}
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata" || d.Name() == "node_modules") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, re := range []*regexp.Regexp{descRe, optsRe} {
			for _, m := range re.FindAllStringSubmatch(string(b), -1) {
				if _, dup := out[m[1]]; dup {
					t.Errorf("%s: metric %s defined twice", path, m[1])
				}
				out[m[1]] = metric{labels: labelList(m[2])}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) < 40 {
		t.Fatalf("found only %d metrics in the code: the scan is broken", len(out))
	}
	return out
}

func docMetrics(t *testing.T) map[string]metric {
	t.Helper()
	b, err := os.ReadFile("metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]metric{}
	for _, m := range rowRe.FindAllStringSubmatch(string(b), -1) {
		if _, dup := out[m[1]]; dup {
			t.Errorf("metrics.md lists %s twice", m[1])
		}
		out[m[1]] = metric{kind: m[2], labels: labelList(m[3])}
	}
	return out
}

// TestMetricsDocumented: docs/metrics.md lists exactly the metrics the
// code defines, with their labels, and every name follows the
// conventions (a unit suffix; _total on counters and only on them).
func TestMetricsDocumented(t *testing.T) {
	code, doc := codeMetrics(t), docMetrics(t)
	for name, c := range code {
		d, ok := doc[name]
		if !ok {
			t.Errorf("%s is not in docs/metrics.md", name)
			continue
		}
		if !slices.Equal(c.labels, d.labels) {
			t.Errorf("%s: labels %v in the code, %v in docs/metrics.md", name, c.labels, d.labels)
		}
	}
	for name, d := range doc {
		if _, ok := code[name]; !ok {
			t.Errorf("docs/metrics.md lists %s, which the code does not define", name)
		}
		if (d.kind == "counter") != strings.HasSuffix(name, "_total") {
			t.Errorf("%s is a %s: _total is for counters, and every counter has it", name, d.kind)
		}
		base := strings.TrimSuffix(name, "_total")
		if strings.Contains(base, "_total") || strings.HasSuffix(name, "_count") || strings.HasSuffix(name, "_sum") || strings.HasSuffix(name, "_bucket") {
			t.Errorf("%s: _total, _count, _sum and _bucket are suffixes Prometheus reserves", name)
		}
		for _, unit := range []string{"bytes", "seconds"} {
			if strings.Contains(base, unit) && !strings.HasSuffix(base, "_"+unit) {
				t.Errorf("%s: the unit (%s) goes last, before _total", name, unit)
			}
		}
	}
}

// TestGrafanaDashboard: the dashboard parses and queries only metrics
// that exist.
func TestGrafanaDashboard(t *testing.T) {
	b, err := os.ReadFile("../contrib/grafana/doppel.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("contrib/grafana/doppel.json: %v", err)
	}
	if dash.Title == "" || len(dash.Panels) == 0 {
		t.Fatal("contrib/grafana/doppel.json: no title or no panels")
	}
	code := codeMetrics(t)
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q queries nothing", p.Title)
		}
		for _, q := range p.Targets {
			names := nameRe.FindAllString(q.Expr, -1)
			if len(names) == 0 {
				t.Errorf("panel %q: %q names no doppel metric", p.Title, q.Expr)
			}
			for _, n := range names {
				if _, ok := code[n]; !ok {
					t.Errorf("panel %q queries %s, which the code does not define", p.Title, n)
				}
			}
		}
	}
}
