const Koa = require('koa');
const app = new Koa();
app.use(async (ctx) => {
  if (ctx.path === '/slow') await new Promise((r) => setTimeout(r, Number(process.env.SLOW_MS || 1500)));
  ctx.body = `${ctx.path === '/slow' ? 'slow answer' : 'hello'} from pid ${process.pid}\n`;
});
app.listen(process.env.PORT, '127.0.0.1');
