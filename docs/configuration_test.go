package docs_test

import (
	"os"
	"reflect"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/doppelha/doppel/daemon/agent"
)

// yamlKeys lists the YAML keys of a config struct, nested ones as
// parent.child.
func yamlKeys(t reflect.Type, prefix string) []string {
	var keys []string
	for i := range t.NumField() {
		f := t.Field(i)
		tag := strings.Split(f.Tag.Get("yaml"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		if f.Type.Kind() == reflect.Struct {
			keys = append(keys, yamlKeys(f.Type, prefix+tag+".")...)
			continue
		}
		keys = append(keys, prefix+tag)
	}
	return keys
}

// TestConfigurationDocumented: docs/configuration.md names every key the
// agent reads from agent.yaml, and the installed agent.yaml sets only
// keys the agent reads.
func TestConfigurationDocumented(t *testing.T) {
	b, err := os.ReadFile("configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	keys := yamlKeys(reflect.TypeFor[agent.Config](), "")
	if len(keys) < 10 {
		t.Fatalf("found only %d agent.yaml keys: %v", len(keys), keys)
	}
	for _, k := range keys {
		if !strings.Contains(doc, "| `"+k+"` |") {
			t.Errorf("agent.yaml key %s is not in docs/configuration.md", k)
		}
	}
	raw, err := os.ReadFile("../cmd/doppel/agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg agent.Config
	dec := yaml.NewDecoder(strings.NewReader(string(raw)))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("cmd/doppel/agent.yaml: %v", err)
	}
}
